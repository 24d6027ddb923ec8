from django.db import models


class Order(models.Model):
    id = models.CharField(max_length=40, primary_key=True)

    class Meta:
        app_label = "shop"
